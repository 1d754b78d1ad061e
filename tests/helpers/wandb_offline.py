"""Read an offline W&B run (`wandb/offline-run-*/run-<id>.wandb`) back, for assertions.

wandb ships no reader for this file: it is W&B's protobuf `Record` messages in a LevelDB-style log
(a 7-byte header ":W&B" + magic + version, then 32 KiB blocks of records, each with a 7-byte
header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4).

W&B's service writes the file on its own schedule: right after `finish()` returns it can still hold
only the 7-byte header (seen in CI, and here about 1 run in 10), so `records` waits for the run's
closing `exit` record.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path, timeout: float = 60.0) -> list[Any]:
    """A finished run's records, once the service has written them all (through `exit`)."""
    deadline = time.monotonic() + timeout
    while True:
        parsed = _parse(path)
        if parsed and parsed[-1].WhichOneof("record_type") == "exit":
            return parsed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout:.0f} s: the run did not finish")
        time.sleep(0.1)


def _parse(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER:  # not written yet
        return []
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if pos + length > len(data):  # the service is still writing this record
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            pending = b""
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
        elif kind == 0 and length == 0:  # zero padding to the block end
            pos += left - HEADER
    parsed = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def run_file(wandb_dir: Path) -> Path:
    (found,) = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))[-1:]
    return found


def history(path: Path) -> list[dict[str, Any]]:
    """Logged rows: {key: value} with `_step`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in updates:
            values[item.key] = json.loads(item.value_json)
    return values


def run_info(path: Path) -> Any:
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise ValueError(f"{path} has no run record")
