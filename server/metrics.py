"""Prometheus metrics, in a registry per app so that tests can build several apps in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine_counters import EngineCounterCollector
from .grammar_metrics import GrammarCollector

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.time_to_first_token = Histogram(
            "ovis2_time_to_first_token_seconds",
            "Time from request arrival to its first output token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "ovis2_inter_token_latency_seconds",
            "Time between consecutive output tokens (time per output token).",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "ovis2_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ovis2_request_queue_time_seconds",
            "Time from handing a request to the engine until it starts running.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_time = Histogram(
            "ovis2_request_preprocess_seconds",
            "Time spent fetching, decoding and preprocessing a request's images and prompt.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.num_running = Gauge(
            "ovis2_num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.num_waiting = Gauge(
            "ovis2_num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.kv_cache_usage = Gauge(
            "ovis2_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", labels, registry=r
        )
        self.kv_free_blocks = Gauge("ovis2_kv_cache_free_blocks", "Free KV cache blocks.", labels, registry=r)
        self.kv_total_blocks = Gauge(
            "ovis2_kv_cache_total_blocks", "KV cache blocks in all.", labels, registry=r
        )
        self.image_pixels_in_flight = Gauge(
            "ovis2_image_pixels_in_flight",
            "Decoded image pixels held against --max-image-pixels-in-flight.",
            labels,
            registry=r,
        )
        self.media_bytes_in_flight = Gauge(
            "ovis2_media_bytes_in_flight",
            "Encoded image and video bytes held against --max-media-bytes-in-flight.",
            labels,
            registry=r,
        )
        self.requests_waiting_for_pixels = Gauge(
            "ovis2_requests_waiting_for_image_pixels",
            "Requests waiting for the decoded-pixel budget.",
            labels,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ovis2_prompt_tokens", "Prompt tokens processed, image tokens included.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "ovis2_generation_tokens", "Output tokens generated.", labels, registry=r
        )
        self.image_tokens = Counter(
            "ovis2_image_tokens", "Prompt tokens that stand for images.", labels, registry=r
        )
        self.images = Counter("ovis2_images", "Images processed (video frames apart).", labels, registry=r)
        self.videos = Counter("ovis2_videos", "Videos decoded.", labels, registry=r)
        self.video_frames = Counter(
            "ovis2_video_frames", "Video frames decoded (259 prompt tokens each).", labels, registry=r
        )
        self.video_decode_time = Histogram(
            "ovis2_video_decode_seconds",
            "Time to decode a video's sampled frames, once its packets were read.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "ovis2_requests",
            "Finished requests by finish reason (stop, length, abort, error).",
            labels + ["finished_reason"],
            registry=r,
        )
        self.structured_requests = Counter(
            "ovis2_structured_requests",
            "Requests with a structured output, by kind (json, json_object, regex, choice, grammar).",
            labels + ["kind"],
            registry=r,
        )
        self.grammars = GrammarCollector(model_name)
        r.register(self.grammars)
        self.engine_counters = EngineCounterCollector(model_name)
        r.register(self.engine_counters)
        self._labels = {"model_name": model_name}

    def observe(self, histogram: Histogram, seconds: float) -> None:
        histogram.labels(**self._labels).observe(seconds)

    def count(self, counter: Counter, amount: float = 1.0, **labels: str) -> None:
        if amount:
            counter.labels(**self._labels, **labels).inc(amount)

    def update_engine_stats(self, stats) -> None:
        self.num_running.labels(**self._labels).set(stats.num_running)
        self.num_waiting.labels(**self._labels).set(stats.num_waiting)
        self.kv_cache_usage.labels(**self._labels).set(stats.kv_cache_usage)
        self.kv_free_blocks.labels(**self._labels).set(stats.num_free_blocks)
        self.kv_total_blocks.labels(**self._labels).set(stats.num_total_blocks)
        self.grammars.update(stats)
        self.engine_counters.update(stats)

    def video_decoded(self, seconds: float, num_frames: int) -> None:
        self.observe(self.video_decode_time, seconds)
        self.count(self.videos)
        self.count(self.video_frames, num_frames)

    def update_pixel_budget(self, budget) -> None:
        self.image_pixels_in_flight.labels(**self._labels).set(budget.in_use)
        self.requests_waiting_for_pixels.labels(**self._labels).set(budget.num_waiting)

    def update_media_bytes(self, budget) -> None:
        self.media_bytes_in_flight.labels(**self._labels).set(budget.in_use)

    def render(self) -> bytes:
        return generate_latest(self.registry)
