"""The event pipeline: an S3 event becomes a staged change.

Event parsing (``events``), object key to repository path
(``object_keys``), file mode decision (``modes``), bringing one key's staged
state to what S3 holds (``fetch``) and the bounded download pool
(``dispatch``).
"""
