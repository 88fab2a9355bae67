"""``POST /recommend``: its router, schemas and use case (``Recommender``)."""
