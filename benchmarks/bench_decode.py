"""Decode + normalize rate per source, against fastavro's bare ``schemaless_reader`` on the same
bytes (the ceiling: reading Avro and nothing else), in one run. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_decode.py [--messages 20000] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import fastavro

from pipeline import schemas
from pipeline.decode import decode, encode_avro
from pipeline.events import DeadLetter
from pipeline.generate import traffic


def _messages(count: int) -> dict[str, list[tuple[bytes, bytes]]]:
    """Per source: (json bytes, avro wire bytes) of the same synthetic records."""
    by_source: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
    for message in traffic(customers=5000, seed=3, start_ms=int(time.time() * 1000) - 86_400_000, step_ms=100):
        record = json.loads(message.value)
        by_source[message.topic].append((message.value, encode_avro(message.topic, record)))
        if sum(len(v) for v in by_source.values()) >= count:
            return by_source
    raise AssertionError("unreachable")


def _rate(fn, items: list[bytes], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - started)
    return len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    now_ms = int(time.time() * 1000)
    results = []
    for source, pairs in sorted(_messages(args.messages).items()):
        schema = schemas.parsed_schema(schemas.INPUT_SCHEMAS[source])
        avro = [a for _, a in pairs]
        plain = [j for j, _ in pairs]
        assert not any(isinstance(decode(source, a, now_ms=now_ms), DeadLetter) for a in avro)

        def bare(data: bytes, schema=schema) -> object:
            return fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, None)

        ceiling = _rate(bare, avro)
        avro_rate = _rate(lambda d, s=source: decode(s, d, now_ms=now_ms), avro)
        json_rate = _rate(lambda d, s=source: decode(s, d, now_ms=now_ms), plain)
        results.append({"source": source, "messages": len(pairs), "fastavro_bare_per_s": round(ceiling),
                        "decode_avro_per_s": round(avro_rate), "decode_json_per_s": round(json_rate),
                        "avro_ratio": round(avro_rate / ceiling, 3)})
    print(f"{'source':<12}{'n':>7}{'fastavro bare/s':>17}{'decode avro/s':>15}{'ratio':>7}{'decode json/s':>15}")
    for r in results:
        print(f"{r['source']:<12}{r['messages']:>7}{r['fastavro_bare_per_s']:>17,}{r['decode_avro_per_s']:>15,}"
              f"{r['avro_ratio']:>7.2f}{r['decode_json_per_s']:>15,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpu": platform.processor()
                                                or platform.machine()}, "results": results}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
