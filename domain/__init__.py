"""The service's state and rules, shared by the HTTP layer (``app``) and the execution layer
(``worker``): settings, database and tables, job and training-run state transitions, the
checkpoint registry, submissions and their errors. Imports ``models`` only; never FastAPI or
Celery."""
