"""The SQL ledger: which interaction trained which sample and shard, adapter versions, deletions, audit.

``models`` holds the tables, ``repository`` the keyword-only functions every process uses, ``db``
the connections and migrations. Nothing here imports torch (checked by ``lint-imports``).
"""
