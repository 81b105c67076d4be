"""The gradserve gRPC server: validation, assembly, engine dispatch, streaming results.

Run it with `gradserve-server` / `python -m gradserve.server`; embed it with
`gradserve.server.app.serve(ServerConfig(...))`.
"""
