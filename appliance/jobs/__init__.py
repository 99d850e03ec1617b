"""Async batch jobs: an NDJSON upload of request bodies for one endpoint, run line by line in
the background at a lower priority than real-time requests, durably checkpointed on disk so a
job resumes after a crash or restart with every input line answered exactly once.

`store` keeps a job's files, `endpoints` says which endpoints a job may target, `worker` runs
one job, `manager` owns the jobs of a server and `cli` is `appliance batch`.
"""
