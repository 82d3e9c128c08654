"""DICOM ingest: the C-STORE listener, durable storage, series assembly, geometry checks and the queue.

- `listener`: the pynetdicom AE; handlers check, store and answer with a status, nothing more.
- `checks`: what a received data set must satisfy before we acknowledge it.
- `storage`: the durable write (temporary file, fsync, rename) and the database index, one transaction.
- `assembly`: the quiet period that completes a series, forced completion, versions.
- `geometry`: series geometry checks from the headers (findings, never exceptions).
- `queue`: the Celery app, sending completed series versions by internal id, the worker's confirmation.
"""
