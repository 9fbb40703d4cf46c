"""Generation, the one way: the GenerationConfig builder, batched greedy replies, sampled continuations.

Used by generate, evaluate, chat, the app and the RL monitors.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from fluxchat import chat_format, loading

# Sampling this cold picks the likeliest token but for near-exact ties, and from ~1e-38 down the logits divided by
# the temperature overflow to inf and generate() fails: such temperatures decode greedily.
GREEDY_BELOW = 1e-3


def generation_config(
    tokenizer, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0
) -> GenerationConfig:
    """The one GenerationConfig builder: sampling with the given settings, greedy when temperature < GREEDY_BELOW.
    Stops at every stop token of the tokenizer's chat format (end of turn and end of text)."""
    ids = dict(
        eos_token_id=chat_format.stop_token_ids(tokenizer),
        pad_token_id=pad_id(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
    )
    if temperature < GREEDY_BELOW:
        return GenerationConfig(
            do_sample=False, temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=max_new_tokens, **ids
        )
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, **ids
    )


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int = 100, seed: int = 0, **sampling) -> str:
    """One sampled continuation of `prompt`, with the KV cache, reproducible by `seed`; `sampling` holds
    generation_config's temperature (0: greedy), top_k and top_p."""
    was_training = model.training
    model.eval()
    context = loading.context_length(model)
    max_new_tokens = min(max_new_tokens, context - 1)  # a position-embedding model cannot go past its context
    ids = chat_format.encode_text(tokenizer, prompt) or [tokenizer.bos_token_id]
    ids = ids[-(context - max_new_tokens) :]
    device = loading.device_of(model)
    torch.manual_seed(seed)
    config = generation_config(tokenizer, max_new_tokens, **sampling)
    out = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        generation_config=config,
    )
    model.train(was_training)
    return chat_format.decode_text(tokenizer, out[0, len(ids) :].tolist())


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    temperature: float = 0.0,
) -> list[dict]:
    """Greedy replies to each conversation: [{"reply", "response_tokens", "stopped", "prompt_ids", "reply_ids"}] in
    input order (`reply_ids`: the new tokens, the stop token included). With `temperature` > 0, replies sampled
    from the whole distribution at that temperature (no top-k), as PPO samples them.

    Prompts are sorted by length and left-padded in batches (the KV cache makes each new token one
    forward step). A prompt longer than the context keeps its newest tokens; near the context limit
    fewer new tokens are generated, so an over-long expected answer simply fails.
    """

    was_training = model.training
    model.eval()
    device, context, pad = loading.device_of(model), loading.context_length(model), pad_id(tokenizer)
    stops = chat_format.stop_token_ids(tokenizer)
    rendered = chat_format.render_conversations(tokenizer, conversations, add_generation_prompt=True)
    prompts = [ids[-(context - 1) :] for ids, _ in rendered]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict] = [{}] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, longest - len(prompts[i]) :] = 1
        config = generation_config(
            tokenizer, max(1, min(max_new_tokens, context - longest)), temperature=temperature, top_k=0
        )
        # generate() merges the model's own (sampling) defaults into a passed config; swap it instead.
        saved_config, model.generation_config = model.generation_config, config
        try:
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        finally:
            model.generation_config = saved_config
        for row, i in enumerate(batch):
            new_tokens = output[row, longest:].tolist()
            end = next((k for k, token in enumerate(new_tokens) if token in stops), None)
            reply_tokens = new_tokens if end is None else new_tokens[:end]
            results[i] = {
                "reply": chat_format.reply_text(tokenizer, chat_format.decode_text(tokenizer, reply_tokens)),
                "response_tokens": len(reply_tokens),
                "stopped": end is not None,
                "prompt_ids": prompts[i],
                "reply_ids": new_tokens if end is None else new_tokens[: end + 1],
            }
    model.train(was_training)
    return results
