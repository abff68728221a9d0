"""gRPC server options every worker server uses (torch-free, so the simulated worker can share them)."""

# gRPC core cancels calls that wait for the application to pick them up once more than 1000 are
# pending (soft limit, randomly) or 3000 (hard): a burst of thousands of new streams hits that while
# the event loop is busy. Admission is the worker's own job (KV room, max concurrency), so lift core's.
SERVER_OPTIONS = (("grpc.server.max_pending_requests", 1 << 20),
                  ("grpc.server.max_pending_requests_hard_limit", 1 << 20))
