"""Stored ciphertexts end to end: where they live, what keys they depend on, moving them.

- :mod:`.sources`: one URL-like argument names a PostgreSQL or SQLite table column, a
  directory of envelope files, or a JSON-lines / CSV file with a token field.
- :mod:`.census`: counts by classification x key reference x region set, from headers
  only (no key-service call); the last census per source is recorded for ``keys status``
  and ``keys retire``.
- :mod:`.jobs`: the ``kmsguard_rewrap`` job table (databases) and the journal (files)
  that make a run resumable and let many workers share it.
- :mod:`.rewrap` and :mod:`.migrate`: what one batch does to its values: move them to the
  current key, or encrypt the plaintext ones.
- :mod:`.runner`: claims batches and applies them with the concurrent-write guard,
  progress and the rate cap.
- :mod:`.retire`: retiring an old key once a census shows nothing depends on it.

This layer sits above :mod:`kmsguard.guard` and uses only Guard's public API.
"""
