"""`autoquant serve`: the tuned pipeline behind an HTTP API, with a bounded queue and dynamic
batching. Needs the `serve` extra (fastapi, uvicorn); nothing outside this package imports them.

    from autoquant.serve.app import create_app      # FastAPI app around a Worker
    from autoquant.serve.worker import Worker        # the thread that owns the pipeline
    from autoquant.serve.command import add_parser, run   # the CLI command

A request is bounded before it is queued (admission.py: memory and time on this machine), and
/report is served without the server's paths (report.py).
"""
