"""The retraining worker: an RQ ``SimpleWorker`` (no fork per job) that loads the base model once.

``queue`` (names, enqueue with de-duplication, pub/sub) is shared with the gateway and imports no
torch; ``tasks`` holds the jobs, ``reconciler`` the periodic catch-up, ``main`` the process.
"""
