"""The service core shared by the API (``api/``) and the workers (``workers/``): settings,
the database and its models, storage, the queue producer and the domain logic (reviews,
reports, blinding). Free of web frameworks and of torch; it imports neither ``api`` nor
``workers``."""
