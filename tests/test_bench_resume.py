"""The resume benchmark compares like with like: mlx-lm's file holds exactly the restored tokens."""

from __future__ import annotations

from semantic_cli.backend import runtime
from semantic_cli.bench.resume import first_tokens


def test_mlx_lm_is_given_exactly_the_tokens_the_restore_brings_back(tmp_path):
    mx = runtime.mx()
    from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache

    live = KVCache()
    live.update_and_fetch(mx.random.normal((1, 2, 300, 8)), mx.random.normal((1, 2, 300, 8)))
    assert live.state[0].shape[2] > 300  # mlx-lm 0.32 saves the spare room too
    window = RotatingKVCache(max_size=16)
    window.update_and_fetch(mx.random.normal((1, 2, 20, 8)), mx.random.normal((1, 2, 20, 8)))
    cut = first_tokens([live, window], 290)
    assert cut[1] is window  # other layer kinds are saved as they are
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, cut)
    loaded = load_prompt_cache(path)
    assert loaded[0].keys.shape[2] == 290 and loaded[0].offset == 290
    assert mx.array_equal(loaded[0].keys, live.keys[..., :290, :]).item()
    assert mx.array_equal(loaded[0].values, live.values[..., :290, :]).item()
