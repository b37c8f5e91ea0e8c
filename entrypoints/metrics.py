"""Prometheus export of the scheduler's numbers (docs/metrics.md lists them).

Names carry the `mlaserve:` prefix and follow vLLM's where the meaning is the same, so a vLLM
dashboard ports by changing the prefix. The collector reads the server's latest EngineStats
snapshot; it never talks to the engine itself (ZeroMQ sockets stay on the server's thread).
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, MetricsHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "mlaserve:"

HISTOGRAM_HELP = {
    "time_to_first_token_seconds": "Time from arrival to the first generated token.",
    "inter_token_latency_seconds": "Time between consecutive generated tokens of a request.",
    "time_per_output_token_seconds": "Per request: (last token time - first token time) / (tokens - 1).",
    "e2e_request_latency_seconds": "Time from arrival to finish, per finished request.",
    "request_queue_time_seconds": "Time from arrival to first being scheduled.",
    "request_prompt_tokens": "Prompt length of finished requests.",
    "request_generation_tokens": "Generated tokens of finished requests.",
    "step_duration_seconds": "Wall time of one engine step (schedule, model, update).",
    "batch_size": "Requests scheduled in one engine step.",
    "kv_tier_load_seconds": "Time a request waited for its prefix's blocks to be read back from disk.",
}


SERVER_COUNTERS = {
    "requests_received": "Generate messages received.",
    "bad_messages": "Frames refused as unreadable.",
    "requests_refused_by_limits": "Requests refused by a per-connection limit.",
    "clients_disconnected": "Clients whose connection closed with requests unfinished.",
}


class EngineCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        stats, counters, health = self.server.stats_snapshot()
        # The counters the frontend keeps (the HTTP server has no frames or per-connection limits).
        for key, doc in SERVER_COUNTERS.items():
            if key in counters:
                yield _counter(f"server_{key}", doc, counters[key])
        yield _gauge("engine_healthy", "1 while the engine runs; 0 once it failed (health says why).",
                     float(health.status != "engine_dead"))
        yield _gauge("stats_age_seconds", "Age of the engine numbers below (the scheduler answers between "
                     "steps; a value growing past a step's length means it is stuck).", health.stats_age_s)
        if stats is None:
            return
        yield from _engine_numbers(stats)
        yield from _spec_decode(stats)
        yield from _expert_load(stats)
        if stats.kv_tiers is not None:
            yield from _kv_tiers(stats.kv_tiers)
        if stats.metrics is not None:
            yield from _request_metrics(stats.metrics)


def _engine_numbers(stats):
    yield _gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
    yield _gauge("num_requests_waiting", "Requests waiting to be admitted (preempted ones included).",
                 stats.num_waiting)
    yield _counter("num_preemptions", "Requests preempted for lack of cache blocks.", stats.num_preemptions)
    used = 1.0 - stats.num_free_blocks / stats.num_blocks if stats.num_blocks else 0.0
    yield _gauge("kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0-1).", used)
    yield _gauge("kv_cache_num_blocks", "Latent-cache blocks in the pool.", stats.num_blocks)
    yield _gauge("kv_cache_free_blocks", "Latent-cache blocks free (cached-but-unused ones included).",
                 stats.num_free_blocks)
    yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                   stats.prefix_cache_queries)
    yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
    yield _counter("prompt_tokens", "Prompt tokens of admitted requests.", stats.prompt_tokens)
    yield _counter("generation_tokens", "Generated tokens.", stats.generation_tokens)
    yield _counter("engine_steps", "Engine steps run.", stats.num_steps)


def _request_metrics(snap):
    """Finished requests by reason and the latency histograms."""
    finished = CounterMetricFamily(PREFIX + "request_success", "Finished requests by reason.",
                                   labels=["finished_reason"])
    for reason, n in sorted(snap.finished.items()):
        finished.add_metric([reason], n)
    yield finished
    for name, h in snap.histograms.items():
        buckets, cumulative = [], 0
        for bound, count in zip(h.bounds + [float("inf")], h.counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(PREFIX + name, HISTOGRAM_HELP.get(name, name), buckets=buckets,
                                    sum_value=h.total)


def _spec_decode(stats):
    yield _counter("spec_decode_num_drafts", "Verifications of MTP drafts (decode steps of a request that had drafts).",
                   stats.spec_num_drafts)
    yield _counter("spec_decode_num_draft_tokens", "MTP draft tokens verified.", stats.spec_draft_tokens)
    yield _counter("spec_decode_num_accepted_tokens", "MTP draft tokens accepted.", stats.spec_accepted_tokens)
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                  "MTP draft tokens accepted, by draft position (0: the first draft).",
                                  labels=["position"])
    for pos, n in enumerate(stats.spec_accepted_per_pos):
        per_pos.add_metric([str(pos)], n)
    yield per_pos
    if stats.spec_draft_lengths:
        buckets, cumulative = [], 0
        for d, n in enumerate(stats.spec_draft_lengths):
            cumulative += n
            buckets.append((repr(float(d)), cumulative))
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(PREFIX + "spec_decode_draft_length", "Drafts a request proposed at a sampling "
                                    "step, as the draft-length policy chose (0: none).", buckets=buckets,
                                    sum_value=float(sum(d * n for d, n in enumerate(stats.spec_draft_lengths))))
        yield _gauge("spec_decode_step_draft_length", "The draft length the policy chose for the latest step.",
                     stats.spec_step_draft_length)


def _kv_tiers(t):
    hits = CounterMetricFamily(PREFIX + "kv_tier_hits", "Prompt tokens loaded from a lower tier of the prefix "
                               "cache instead of computed.", labels=["tier"])
    hits.add_metric(["host"], t.host_hit_tokens)
    hits.add_metric(["disk"], t.disk_hit_tokens)
    yield hits
    moved = CounterMetricFamily(PREFIX + "kv_tier_bytes", "Latent-cache bytes copied between tiers.",
                                labels=["direction"])
    for direction, n in (("pool_to_host", t.bytes_pool_to_host), ("host_to_pool", t.bytes_host_to_pool),
                         ("host_to_disk", t.bytes_host_to_disk), ("disk_to_host", t.bytes_disk_to_host)):
        moved.add_metric([direction], n)
    yield moved
    yield _counter("kv_tier_read_failures", "Block files that were missing, truncated, corrupt or of another "
                   "model (each a miss).", t.reads_failed)
    yield _counter("kv_tier_copy_seconds", "Workers' time copying between the pool and host memory before "
                   "steps.", t.copy_seconds)
    used = GaugeMetricFamily(PREFIX + "kv_tier_blocks_used", "Blocks a lower tier holds.", labels=["tier"])
    used.add_metric(["host"], t.host_blocks_used)
    used.add_metric(["disk"], t.disk_blocks_used)
    yield used
    size = GaugeMetricFamily(PREFIX + "kv_tier_blocks", "Blocks a lower tier can hold.", labels=["tier"])
    size.add_metric(["host"], t.host_blocks)
    size.add_metric(["disk"], t.disk_blocks)
    yield size


def _expert_load(stats):
    if not stats.routed_tokens:
        return
    experts = CounterMetricFamily(PREFIX + "moe_routed_tokens", "Token choices routed to each routed expert, "
                                  "summed over MoE layers (the MTP module's included).", labels=["expert"])
    for e, n in enumerate(stats.routed_tokens):
        experts.add_metric([str(e)], n)
    yield experts
    if stats.moe_window_rank_load:
        yield _gauge("moe_imbalance", "Over the recent window of steps: per MoE layer the most loaded expert-parallel "
                     "rank's routed token choices over the mean rank's, averaged over layers (1 = even).",
                     stats.moe_imbalance)
        window = GaugeMetricFamily(PREFIX + "moe_rank_load_window", "Token choices routed to each rank's experts "
                                   "over the recent window of steps, all MoE layers.", labels=["rank"])
        for r, n in enumerate(stats.moe_window_rank_load):
            window.add_metric([str(r)], n)
        yield window
    per_rank = len(stats.routed_tokens) // max(1, stats.num_ranks)
    ranks = CounterMetricFamily(PREFIX + "moe_rank_routed_tokens", "Token choices routed to each expert-parallel "
                                "rank's experts (with EPLB: to its slots, counted every few steps).",
                                labels=["rank"])
    for r in range(stats.num_ranks):
        ranks.add_metric([str(r)], stats.rank_routed_tokens[r] if stats.rank_routed_tokens else
                         sum(stats.routed_tokens[r * per_rank : (r + 1) * per_rank]))
    yield ranks
    if stats.rank_routed_tokens:  # EPLB on
        yield _counter("eplb_rebalances", "Expert re-placements made while serving (EPLB).", stats.eplb_rebalances)
        yield _counter("eplb_moved_slots", "Expert slots whose expert changed in re-placements (weights moved).",
                       stats.eplb_moved_slots)
        yield _gauge("eplb_last_switch_seconds", "The latest re-placement's time on its slowest rank (moving the "
                     "experts, between two steps).", stats.eplb_last_seconds)
        yield _gauge("eplb_max_switch_seconds", "The longest re-placement's time on its slowest rank.",
                     stats.eplb_max_seconds)
    running = GaugeMetricFamily(PREFIX + "rank_num_requests_running", "Requests running on each rank.",
                                labels=["rank"])
    for r, n in enumerate(stats.rank_running):
        running.add_metric([str(r)], n)
    yield running


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


MAX_METRICS_CONNECTIONS = 8  # scrapers at once; more are closed unanswered
METRICS_SOCKET_TIMEOUT_S = 5.0  # an idle or slow connection is closed after this


class _BoundedMetricsServer(ThreadingHTTPServer):
    """prometheus_client's handler behind a bounded number of connection threads, each with a
    socket timeout: idle connections cannot pile up threads."""

    daemon_threads = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(METRICS_SOCKET_TIMEOUT_S)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(server, host: str, port: int):
    """Serves /metrics on host:port (0 picks a free port: see `.server_port`). Returns the HTTP
    server; `.shutdown()` stops it."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(server))
    httpd = _BoundedMetricsServer((host, port), MetricsHandler.factory(registry))
    threading.Thread(target=httpd.serve_forever, name="mlaserve-metrics", daemon=True).start()
    return httpd
