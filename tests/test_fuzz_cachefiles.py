"""Fuzzing the block and tail readers (issue 18, item 11): random and mutated headers,
sizes and bodies, fed to the header parser (fileread.header_of), the restore
(kv/restore.read_cache) and `cache verify`'s checker (admin._check_block / _check_file).

For every case: nothing raises, nothing takes long, nothing allocates beyond what the
file's size and the model's spec allow (tracemalloc for Python and numpy, MLX's own peak
for its buffers), and a mutated file is reported as damaged, never silently accepted.
A mutation comes two ways: with the index left as it was (the checksum must catch it),
or with an index row that vouches for the new bytes, as someone who can write the cache
directory could make (then it is damage, or a file the spec accepts in every array's
geometry and dtype). Fixed seeds; a few seconds.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import math
import random
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from cachefiles import build, checksum, split, synthetic_cache

from semantic_cli.backend import buffers, runtime
from semantic_cli.kv import admin, blockfile, fileread
from semantic_cli.kv.blockfile import BlockFileError, block_path, tails_dir
from semantic_cli.kv.index import BlockRow, KVIndex
from semantic_cli.kv.layers import CacheSpec
from semantic_cli.kv.restore import CacheFile, read_cache
from semantic_cli.kv.store import KVStore

SPEC = CacheSpec.uniform(("kv", "RotatingKVCache", "kv"), heads=2, head_dim=8, window=16)
B = 16  # block tokens: two blocks and an 8-token tail
TOKENS = 40
IDS = [(13 * i) % 97 for i in range(TOKENS)]
CASES = 700  # per restore code (native, python): with the parser-only cases, thousands in all
CASE_LIMIT_S = 2.0  # no single case may take longer (a hang fails the test well before this)
INTERESTING: list[Any] = [
    -1,
    0,
    1,
    2**31,
    2**63,
    -(2**63),
    1e308,
    float("nan"),
    True,
    None,
    "O",
    "foo",
    "float64",
    "bfloat16",
    "",
    "x" * 300,
    [],
    {},
    [2**40, 2**40, 2**40],
    [1, -5, 8],
    [[[[[[]]]]]],
    {"name": "k0"},
]


@pytest.fixture(params=["native", "python"])
def restore_code(request, monkeypatch) -> str:
    if request.param == "python":
        monkeypatch.setenv("SEMANTIC_NATIVE", "0")
    elif buffers.restore_code() != "native":
        pytest.skip("the native restore loops are not built here")
    return request.param


def _persisted() -> tuple[list[CacheFile], list[BlockRow], list[bytes]]:
    cache = synthetic_cache(SPEC.kinds, TOKENS // 10, 10, window=16, seed=11)
    KVStore(B, 1 << 40, 0).persist("f", "fp", SPEC, IDS, cache, protect=set())
    index = KVIndex()
    chain, tail = index.chain("f"), index.tail("f")
    rows = index.blocks(chain)
    index.close()
    assert tail is not None
    files = [CacheFile(block_path(h), rows[h].checksum, rows[h].nbytes, i * B, B, h) for i, h in enumerate(chain)]
    files.append(CacheFile(tails_dir() / tail.file, tail.checksum, tail.nbytes, tail.start, tail.n_tokens, None))
    return files, [rows[h] for h in chain], [f.path.read_bytes() for f in files]


# ---- mutations: each takes the file's bytes and returns new ones ----------------------
def _flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    i = rng.randrange(len(out))
    chunk = rng.randbytes(rng.randint(1, 64))
    out[i : i + len(chunk)] = chunk
    return bytes(out[: len(data)])


def _resize(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    return data + rng.randbytes(rng.choice([1, 7, 64, 4096]))


def _header_length(rng: random.Random, data: bytes) -> bytes:
    n = rng.choice([0, 1, 7, len(data), 2**31, 2**32 - 1, rng.randrange(2**32)])
    return data[:6] + struct.pack("<I", n) + data[10:]


def _garbage(rng: random.Random, data: bytes) -> bytes:
    body = rng.randbytes(rng.choice([0, 3, 10, 64, 300, len(data)]))
    return (blockfile.MAGIC + body) if rng.random() < 0.5 else body


def _json_garbage(rng: random.Random, data: bytes) -> bytes:
    _, body = split(data)
    head = rng.choice(
        [
            b"[" * 3000 + b"]" * 3000,
            b'{"arrays":' + b"[" * 2000 + b"]" * 2000 + b"}",
            b"\xff\xfe{}",
            b'{"a":1',
            b"1e999999",
            b'"' + b"x" * 1000 + b'"',
            b'{"tokens":[' + b"9" * 5000 + b"]}",
        ]
    )
    return build(head, body)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out += _paths(v, prefix + (i,))
    return out


def _header_field(rng: random.Random, data: bytes) -> bytes:
    """One field of the parsed header replaced, removed, or an array entry added or repeated."""
    header, body = split(data)
    header = copy.deepcopy(header)
    choice = rng.random()
    if choice < 0.15:
        extra = {"name": rng.choice(["k0", "v1", "s1:0", "s1:9", "s0:0", "k9", "x"]), "dtype": rng.choice(["float32", "O", "int8"])}
        extra |= {
            "shape": rng.choice(INTERESTING + [[2, 4, 8], [1, 2, 16, 8]]),
            "offset": len(body),
            "nbytes": rng.choice([0, 8, 256, 2**40]),
        }
        header["arrays"].append(extra)
        body += bytes(extra["nbytes"]) if isinstance(extra["nbytes"], int) and extra["nbytes"] <= 256 else b""
    elif choice < 0.2 and header["arrays"]:
        header["arrays"].append(copy.deepcopy(rng.choice(header["arrays"])))
    else:
        path = rng.choice(_paths(header)[1:])
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(INTERESTING))
    return build(json.dumps(header, separators=(",", ":")).encode(), body)


def _array_size(rng: random.Random, data: bytes) -> bytes:
    """One array made another size, its byte count to match (a header that would steer an allocation)."""
    header, body = split(data)
    a = rng.choice(header["arrays"])
    dim = rng.randrange(len(a["shape"]))
    a["shape"][dim] = rng.choice([0, 1, 7, 100_000, 3_000_000, -1])
    a["nbytes"] = 4 * abs(math.prod(a["shape"]))
    return build(header, body)


MUTATIONS = [_flip_bits, _overwrite, _resize, _header_length, _garbage, _json_garbage, _header_field, _header_field, _array_size]


def _accepted_as_the_spec_says(cache: list[Any]) -> None:
    """A restore that accepted a crafted file still holds only what the spec describes."""
    mx = runtime.mx()
    for layer, c in zip(SPEC.layers, cache, strict=True):
        if layer.kind == "kv":
            assert c.keys.shape[:2] == (1, layer.heads) and c.keys.shape[3] == layer.k_dim and c.keys.dtype == mx.float32
            assert c.values.shape[3] == layer.v_dim and c.offset == TOKENS
        else:
            assert type(c).__name__ == layer.kind and c.max_size == layer.window
            assert c.keys.shape[:2] == (1, layer.heads) and c.keys.shape[2] <= layer.token_limit(TOKENS) and c.keys.dtype == mx.float32


def test_fuzzed_block_and_tail_files_are_reported_never_trusted(home, restore_code):
    mx = runtime.mx()
    files, rows, originals = _persisted()
    rng = random.Random(f"semantic-fuzz-{restore_code}")
    kv_bytes = 4 * 2 * 256 * 8 * 4  # the restore's own buffers: 2 KV layers x keys, values x 256-token capacity
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the run with a traceback, not a stuck CI job
    tracemalloc.start()
    slowest, damaged, accepted = 0.0, 0, 0
    try:
        for case in range(CASES):
            target = rng.randrange(len(files))
            original = originals[target]
            mutated = rng.choice(MUTATIONS)(rng, original)
            if mutated == original:
                continue
            vouched = rng.random() < 0.5  # the index row rewritten to match, as an attacker could
            file = files[target]
            if vouched:
                file = CacheFile(file.path, checksum(mutated), len(mutated), file.start, file.n_tokens, file.block_hash)
            file.path.write_bytes(mutated)
            chain = files[:target] + [file] + files[target + 1 :]
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            tracemalloc.reset_peak()
            traced_base = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()

            with contextlib.suppress(BlockFileError):  # the header parser: a dict, or BlockFileError
                fileread.header_of(file.path, file.nbytes, fileread.header_limit(file.n_tokens, len(SPEC.layers)))
            cache, matched, damage = read_cache(SPEC, chain, IDS + [1], TOKENS + 1)
            if file.block_hash is not None:
                row = rows[target]
                reason = admin._check_block(BlockRow(row.hash, row.model, row.parent, row.n_tokens, file.nbytes, file.checksum, 0.0))
            else:
                reason = admin._check_file(file.path, file.checksum, file.nbytes)

            took = time.perf_counter() - started
            slowest = max(slowest, took)
            assert took < CASE_LIMIT_S, f"case {case} took {took:.2f} s"
            traced = tracemalloc.get_traced_memory()[1] - traced_base
            assert traced <= 64 * len(mutated) + (4 << 20), f"case {case}: {traced} bytes traced for a {len(mutated)}-byte file"
            assert mx.get_peak_memory() - base <= kv_bytes + 4 * len(mutated) + (1 << 20), (
                f"case {case}: MLX peak {mx.get_peak_memory() - base}"
            )
            if damage is not None:
                assert damage.file.path == file.path and cache is None and matched == 0, (case, damage)
                damaged += 1
            else:
                assert vouched, f"case {case}: a mutated file was accepted with the index's old checksum ({mutated[:80]!r})"
                assert cache is not None and matched == TOKENS
                _accepted_as_the_spec_says(cache)
                accepted += 1
            if not vouched:
                assert reason is not None, f"case {case}: verify passed a mutated file"
            del cache
            file.path.write_bytes(original)
    finally:
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
    assert damaged > CASES // 2  # most mutations are damage; some vouched ones (changed token bytes) are data
    assert slowest < CASE_LIMIT_S


def test_random_files_never_crash_the_header_parser(tmp_path):
    """Pure noise and near-misses: the parser returns a dict or raises BlockFileError."""
    rng = random.Random(7)
    path = tmp_path / "f.kv"
    for _ in range(3000):
        head = rng.choice([b"", blockfile.MAGIC, blockfile.MAGIC + struct.pack("<I", rng.randrange(64))])
        data = head + rng.randbytes(rng.randrange(0, 200))
        path.write_bytes(data)
        with contextlib.suppress(BlockFileError):
            assert isinstance(fileread.header_of(path, len(data)), dict)
        with pytest.raises(BlockFileError):
            fileread.header_of(path, len(data) + 1)  # not the size the index records


def test_the_fuzzer_s_pristine_files_restore(home):
    """The cases start from sound files: unmutated, they restore whole."""
    files, _, _ = _persisted()
    cache, matched, damage = read_cache(SPEC, files, IDS + [1], TOKENS + 1)
    assert damage is None and matched == TOKENS
    _accepted_as_the_spec_says(cache)
    assert all(isinstance(f.path, Path) for f in files)
