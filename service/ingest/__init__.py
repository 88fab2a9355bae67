"""Online learning: ``POST /users/{user_id}/interactions``; its router, schemas and use case
(``IngestionService``)."""
