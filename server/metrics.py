"""Prometheus metrics, named in the spirit of Triton Inference Server's nv_inference_*.

gradserve_request_total{outcome}                 jobs by outcome ("ok" or a status code)
gradserve_timed_out_total{timer}                 jobs a server timer ended (DEADLINE_EXCEEDED):
                                                 upload_idle, upload_rate, half_close,
                                                 download_idle
gradserve_request_duration_seconds{phase}        upload, queue, compute, download per job
gradserve_launch_total{engine,device}            engine launches
gradserve_launch_jobs / gradserve_launch_models  jobs and models per launch (histograms)
gradserve_flops_total{engine,device}             FLOPs computed
gradserve_inflight_jobs, gradserve_inflight_bytes, gradserve_queued_jobs   gauges
gradserve_compiled_kernels, gradserve_compiled_kernel_evictions, gradserve_kernel_cache_bytes
                                                 gauges (kernels.compiled_kernels)
plus prometheus_client's process_* metrics (resident memory, CPU seconds, open fds).

Served over HTTP by prometheus_client when --metrics-port is set; without the package the
server runs with metrics off.
"""

from __future__ import annotations

import logging

from gradserve.kernels import compiled_kernels

log = logging.getLogger("gradserve.server")

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self, service):
        try:
            import prometheus_client as prom
        except ImportError:
            log.warning("prometheus-client is not installed: metrics are off")
            self.enabled = False
            return
        self.enabled = True
        self._prom = prom
        self.requests = prom.Counter("gradserve_request", "Jobs by outcome", ["outcome"])
        self.timed_out = prom.Counter(
            "gradserve_timed_out", "Jobs a server timer ended, by timer", ["timer"]
        )
        self.durations = prom.Histogram(
            "gradserve_request_duration_seconds", "Seconds per job phase", ["phase"],
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
        )  # fmt: skip
        self.launches = prom.Counter("gradserve_launch", "Engine launches", ["engine", "device"])
        self.flops = prom.Counter("gradserve_flops", "FLOPs computed", ["engine", "device"])
        self.launch_jobs = prom.Histogram(
            "gradserve_launch_jobs", "Jobs per launch", buckets=_SIZE_BUCKETS
        )
        self.launch_models = prom.Histogram(
            "gradserve_launch_models", "Models per launch", buckets=_SIZE_BUCKETS
        )
        for name, doc, read in (
            ("gradserve_inflight_jobs", "Jobs admitted and not finished",
             lambda: service.admission.inflight_jobs),
            ("gradserve_inflight_bytes", "Bytes held by admitted jobs",
             lambda: service.admission.inflight_bytes),
            ("gradserve_queued_jobs", "Jobs waiting for a launch",
             lambda: service.batcher.queued_jobs),
            ("gradserve_compiled_kernels", "Compiled Triton kernels held in memory",
             compiled_kernels.held),
            ("gradserve_compiled_kernel_evictions", "Times every compiled kernel was dropped",
             compiled_kernels.evictions),
            ("gradserve_kernel_cache_bytes", "Bytes in Triton's disk cache at its last prune",
             compiled_kernels.disk_bytes),
        ):  # fmt: skip
            prom.Gauge(name, doc).set_function(read)

    def serve(self, host: str, port: int) -> int | None:
        """Start the HTTP endpoint; return its port (a free one when port is 0)."""
        if not self.enabled:
            return None
        started = self._prom.start_http_server(port, addr=host)
        # prometheus_client >= 0.20 returns (server, thread); older releases return None.
        return started[0].server_port if started else port

    def job_done(self, outcome: str, phases: dict[str, float], timer: str | None) -> None:
        if not self.enabled:
            return
        self.requests.labels(outcome).inc()
        if timer is not None:
            self.timed_out.labels(timer).inc()
        for phase, seconds in phases.items():
            self.durations.labels(phase).observe(seconds)

    def launched(self, engine: str, device: str, jobs: int, models: int, flops: int) -> None:
        if not self.enabled:
            return
        self.launches.labels(engine, device).inc()
        self.flops.labels(engine, device).inc(flops)
        self.launch_jobs.observe(jobs)
        self.launch_models.observe(models)
