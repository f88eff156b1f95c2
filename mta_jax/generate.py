"""Text generation with the decoding cache: prefill the prompt, then one jitted step per new token.

    tokens = generate(model, prompt [B, P], 32, rng=jax.random.key(0), temperature=0.8, top_p=0.9)

The whole of it (prefill and a lax.while_loop over the steps) is one jitted program, compiled once per
shape (and once more for sampling instead of greedy decoding), not once per token: the sampling settings
and eos_id are traced values. Prompts of different lengths share a batch: pass
prompt_lengths and each row is left-padded internally as a separate padding document (segment 0), which
MTA's packing-correct attention never reads, so each row gives what it would give alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax.model import MTATransformer

PROMPT_SEGMENT, PADDING_SEGMENT = 1, 0


def filter_top_k(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """logits [..., V] with all but the k largest set to -inf: exactly k kept (ties go to the lower
    index); k may be traced."""
    return _filtered(logits, k, 1.0)


def filter_top_p(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """logits [..., V] keeping the smallest set of most probable tokens whose probability mass is >= p
    (nucleus sampling), the others -inf; the most probable token is always kept. p may be traced."""
    return _filtered(logits, logits.shape[-1], p)


def _filtered(logits, k, p):
    order = jnp.argsort(-logits, axis=-1, stable=True)
    kept = _top_k_top_p(jnp.take_along_axis(logits, order, axis=-1), k, p)
    return jnp.put_along_axis(jnp.full_like(logits, -jnp.inf), order, kept, axis=-1, inplace=False)


def _top_k_top_p(sorted_logits: jax.Array, k, p) -> jax.Array:
    """Logits sorted in decreasing order [..., V] with those outside the top k, then outside the smallest
    prefix of mass >= p (of the top-k distribution), set to -inf."""
    rank = jnp.arange(sorted_logits.shape[-1])
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where((mass_before < p) | (rank == 0), sorted_logits, -jnp.inf)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens, then to the top_p nucleus."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError(f"rng=None is invalid: temperature={temperature} > 0 samples and needs a PRNG key")
    settings = _sampling_settings(temperature, top_k, top_p, logits.shape[-1])
    return _draw(logits, rng, *settings)


def _sampling_settings(temperature, top_k, top_p, vocab_size) -> jax.Array:
    """(temperature, k, p) as arrays, so that other values reuse the compiled program."""
    k = vocab_size if top_k is None else min(top_k, vocab_size)
    return jnp.float32(temperature), jnp.int32(k), jnp.float32(1.0 if top_p is None else top_p)


@jax.jit
def _draw(logits, rng, temperature, k, p) -> jax.Array:
    """One token per row [B] from logits [B, V]: one sort, the filters in sorted order, one draw."""
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1, stable=True)
    kept = _top_k_top_p(jnp.take_along_axis(logits, order, axis=-1), k, p)
    choice = jax.random.categorical(rng, kept, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be a number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be None or an integer >= 1")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p={top_p!r} is invalid: must be None or a number in (0, 1]")


def generate(
    model: MTATransformer,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    max_len: int | None = None,
    prompt_lengths: jax.Array | None = None,
    prefill_chunk: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """The prompts followed by up to max_new_tokens generated tokens: int32 [B, P + max_new_tokens].

    prompt_tokens: [B, P] ints; prompt_lengths: [B] (default: all P), row b's prompt being
    prompt_tokens[b, :prompt_lengths[b]]. Row b of the result is its prompt, then its new tokens, then
    pad_id up to the common width. eos_id: a row stops after emitting it (the rest of its new tokens
    are eos_id) and the loop ends when every row has. max_len: cache size (default P + max_new_tokens).
    prefill_chunk: prefill in chunks of this many tokens (default: the whole prompt at once).
    temperature, top_k, top_p: see sample_logits; rng: PRNG key, needed when temperature > 0.
    """
    check_sampling(temperature, top_k, top_p)
    if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(
            f"prompt_tokens with shape {prompt_tokens.shape} and dtype {prompt_tokens.dtype} is invalid: "
            "must be integer [B, P]"
        )
    batch, prompt_len = prompt_tokens.shape
    if prompt_len < 1:
        raise ValueError(
            f"prompt_tokens.shape={prompt_tokens.shape} is invalid: the prompt must be non-empty"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    max_len = prompt_len + max_new_tokens if max_len is None else max_len
    if max_len < prompt_len + max_new_tokens:
        raise ValueError(
            f"max_len={max_len} is invalid: the cache must hold the prompt and the new tokens "
            f"(>= {prompt_len + max_new_tokens})"
        )
    chunk = prompt_len if prefill_chunk is None else prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk!r} is invalid: must be None or an integer >= 1")
    if temperature > 0 and rng is None:
        raise ValueError(f"rng=None is invalid: temperature={temperature} > 0 samples and needs a PRNG key")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths.shape={prompt_lengths.shape} is invalid: must be [B] = ({batch},)")
    if not isinstance(prompt_lengths, jax.core.Tracer) and (
        int(prompt_lengths.min()) < 1 or int(prompt_lengths.max()) > prompt_len
    ):
        raise ValueError(
            f"prompt_lengths={prompt_lengths.tolist()} is invalid: each must be in [1, {prompt_len}]"
        )
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_tokens.astype(jnp.int32),
        prompt_lengths,
        rng,
        _sampling_settings(temperature, top_k, top_p, model.cfg.vocab_size),
        jnp.int32(-1 if eos_id is None else eos_id),
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        chunk=chunk,
        greedy=temperature == 0,
        pad_id=pad_id,
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "chunk", "greedy", "pad_id")
)
def _generate(
    graphdef, state, prompt, lengths, rng, settings, eos_id, *, max_new_tokens, max_len, chunk, greedy, pad_id
):
    """The jitted body of generate(); settings = (temperature, k, p) arrays, eos_id -1 for none."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    shift = prompt_len - lengths  # left padding of each row
    index = jnp.arange(prompt_len)
    left_aligned = jnp.take_along_axis(prompt, (index[None, :] - shift[:, None]) % prompt_len, axis=1)
    is_prompt = index[None, :] >= shift[:, None]
    segments = jnp.where(is_prompt, PROMPT_SEGMENT, PADDING_SEGMENT).astype(jnp.int32)
    tokens = jnp.where(is_prompt, left_aligned, pad_id)

    cache = model.init_cache(batch, max_len)
    for start in range(0, prompt_len, chunk):
        stop = min(start + chunk, prompt_len)
        logits, cache = model.decode(tokens[:, start:stop], cache, segment_ids=segments[:, start:stop])

    def sample(logits, key):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else _draw(logits, key, *settings)

    fill = jnp.where(eos_id >= 0, eos_id, pad_id)
    new_tokens = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def not_finished(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(carry):
        """Samples token `step` from the last logits, writes it, and decodes it (its logits, next)."""
        step, logits, cache, new_tokens, done = carry
        token = jnp.where(done, eos_id, sample(logits, jax.random.fold_in(rng, step)))
        done = done | (token == eos_id)  # never true without an eos_id (-1)
        new_tokens = jax.lax.dynamic_update_slice(new_tokens, token[:, None], (0, step))
        logits, cache = model.decode(token[:, None], cache)
        return step + 1, logits[:, -1], cache, new_tokens, done

    carry = (jnp.int32(0), logits[:, -1], cache, new_tokens, done)
    new_tokens = jax.lax.while_loop(not_finished, one_step, carry)[3]
    # Row b: prompt[:length], then its new tokens, then pad_id.
    width = prompt_len + max_new_tokens
    column = jnp.arange(width)[None, :]
    from_prompt = jnp.take_along_axis(prompt, jnp.minimum(column, prompt_len - 1), axis=1)
    new_index = column - lengths[:, None]
    from_new = jnp.take_along_axis(new_tokens, jnp.clip(new_index, 0, max_new_tokens - 1), axis=1)
    out = jnp.where(column < lengths[:, None], from_prompt, from_new)
    return jnp.where(new_index < max_new_tokens, out, pad_id)
