"""Deletions: ``DELETE /users/{user_id}/interactions`` and ``GET /deletions/{request_id}``; its router,
schemas and use case (``DeletionService``)."""
