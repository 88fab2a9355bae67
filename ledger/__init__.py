"""The SQL ledger: which interaction trained which sample and shard, adapter versions, deletions, audit.

``models`` holds the tables; the keyword-only functions every process uses are one module per subject
(``run_import``, ``catalog``, ``deletions``, ``retrains``, ``purges``, sharing ``common``); ``db``
the connections and migrations. Nothing here imports torch (checked by ``lint-imports``).
"""
