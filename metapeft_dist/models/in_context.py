"""In-context few-shot prompting of a causal LM: the baseline a practitioner compares a
meta-learned LoRA init with (``eval.baselines: [in_context]``).

A task's prompt holds its support examples, each as the classifier's prompt followed by
its label's letter and a blank line, then a query's prompt::

    Text: {support 1}\\nLabel: A\\n\\nText: {support 2}\\nLabel: B\\n\\n...Text: {query}\\nLabel:

and is scored as the classifier scores a prompt (models/causal_lm.py): the verbalizer
tokens' logits at the query's last token. Same format, same verbalizer, same tasks: the
only difference from zero-shot prompting is the examples. The examples go in a shuffled
order, a fixed function of the task's support set (:func:`example_order`), not grouped
by label as an episode holds them (the nearest example would always be the last label's)
nor round-robin (A, B, C, D, E, A, ...: SmolLM2-135M then continues the cycle, predicting
A for every query after ..., E).

The tokens are assembled from the corpus prompts (``inputs.ids``: each text's prompt,
already cut to ``max_len`` keeping its ``"\\nLabel:"`` tail), the label's verbalizer token
and the blank line's tokens between a label and the next ``"Text:"``; with a byte-level
BPE this is the tokenization of the whole prompt string (tested against it), as BPE never
merges across the pre-tokenizer's splits at these boundaries.

The shared prefix (the leading special tokens and the support examples) runs once per task
through the LM's trunk into mlx-lm's KV cache (``mlx_lm.models.cache.KVCache``); the
task's queries then run right-padded, a batch at a time, on copies of that cache, so the
prefix is paid once per task rather than once per query, and the full-vocabulary head
never runs (the verbalizer's rows only). With no support examples the prompt is the
query's own prompt: zero-shot prompting, which is what the standard init (B = 0) scores
at step 0 of the ``random`` baseline (up to the float16 rounding of its cached states).

``chat=True`` (the ``in_context_chat`` baseline) prompts an instruction-tuned model as its
users do, through its chat template: one user message holding an instruction, the same
examples and the query's ``Text: ...``, then the assistant's turn begun with ``Label:``,
so the same verbalizer tokens are read::

    <|im_start|>user\nLabel each text with one of the letters A, B, C, D, E.\n\n
    Text: {support 1}\nLabel: A\n\n...Text: {query}<|im_end|>\n<|im_start|>assistant\nLabel:

(SmolLM2's template, which also adds its default system message). Each prompt is the
tokenization of that whole string; the tokens the task's prompts share (their longest
common prefix) run once into the KV cache, the rest per query.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from metapeft_dist.models.causal_lm import (
    LABEL_PREFIX,
    LETTERS,
    PROMPT,
    PROMPT_TAIL,
    CausalLMModel,
)
from metapeft_dist.tree import Params

SEPARATOR = "\n\n"  # between one example's label and the next example's prompt
_QUERY_BATCH = 8  # queries run together on copies of a task's prefix cache
INSTRUCTION = "Label each text with one of the letters {letters}.\n\n"


class InContext:
    """Scores queries by in-context prompting of ``model``'s base LM (or of the adapters
    given) with a task's support set. ``ids`` / ``mask``: the corpus prompts
    (``inputs.ids`` / ``inputs.mask`` of the model's frozen parameters)."""

    def __init__(self, model: CausalLMModel, ids: mx.array, mask: mx.array,
                 chat: bool = False):
        self.model = model
        self.ids = np.array(ids)
        self.lengths = np.array(mask).sum(axis=1)
        tokenizer = model.tokenizer()
        self.tokenizer = tokenizer
        self.lead = leading_specials(tokenizer)
        self.separator = separator_tokens(tokenizer)
        self.letters = [int(t) for t in np.array(model.verbalizer())]
        self.chat = chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"in_context_chat: {model.path} has no chat template; use "
                             "in_context")

    def prompt_text(self, index: int) -> str:
        """A corpus text's classifier prompt ``Text: ...\nLabel:`` as the corpus holds it
        (cut to max_len tokens)."""
        return self.tokenizer.decode([int(t) for t in
                                      self.ids[index, self.lead:self.lengths[index]]])

    def chat_prompts(self, support_x, support_y, query_x) -> tuple[list[int], list[list[int]]]:
        """(the tokens a task's chat prompts share, each query's tokens after them)."""
        letters = ", ".join(LETTERS[:self.model.out_dim])
        head = INSTRUCTION.format(letters=letters) + "".join(
            f"{self.prompt_text(int(support_x[i]))} {LETTERS[int(support_y[i])]}{SEPARATOR}"
            for i in example_order(support_x))
        rows = []
        for q in np.asarray(query_x):
            text = self.prompt_text(int(q))
            text = text[:-len(PROMPT_TAIL)] if text.endswith(PROMPT_TAIL) else text
            whole = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": head + text}], add_generation_prompt=True,
                tokenize=False) + LABEL_PREFIX
            rows.append(list(self.tokenizer.encode(whole, add_special_tokens=False)))
        common = min(len(r) for r in rows) - 1  # every query keeps at least one token
        for i in range(common):
            if any(r[i] != rows[0][i] for r in rows):
                common = i
                break
        return rows[0][:common], [r[common:] for r in rows]

    def prefix(self, support_x: np.ndarray, support_y: np.ndarray) -> list[int]:
        """The shared tokens of a task's prompts: the leading special tokens, then every
        support example (in :func:`example_order`) with its label and a blank line."""
        tokens = [int(t) for t in self.ids[0, :self.lead]] if len(self.ids) else []
        for i in example_order(support_x):
            text = int(support_x[i])
            tokens += [int(t) for t in self.ids[text, self.lead:self.lengths[text]]]
            tokens += [self.letters[int(support_y[i])], *self.separator]
        return tokens

    def query_tokens(self, index: int) -> list[int]:
        """A query's own prompt tokens, after the shared prefix."""
        return [int(t) for t in self.ids[index, self.lead:self.lengths[index]]]

    def logits(self, params: Params, support_x, support_y, query_x,
               batch: int = _QUERY_BATCH) -> mx.array:
        """(queries, out_dim) verbalizer logits of each query of one task, prompted with
        its support set. ``params``: the adapters set into the LM (B = 0: the base LM)."""
        module = self.model.module()
        module.update(tree_unflatten([(n, v) for n, v in params.items()
                                      if not n.startswith("inputs.")]))
        rows = self.model.label_rows()
        query_x = np.asarray(query_x)
        if self.chat:
            prefix, own = self.chat_prompts(np.asarray(support_x), np.asarray(support_y),
                                            query_x)
        else:
            prefix = self.prefix(np.asarray(support_x), np.asarray(support_y))
            own = [self.query_tokens(int(q)) for q in query_x]
        shared = None
        if prefix:
            from mlx_lm.models.cache import make_prompt_cache

            shared = make_prompt_cache(module)
            module.model(mx.array([prefix], dtype=mx.int32), cache=shared)
            mx.eval([c.keys for c in shared], [c.values for c in shared])
        out = []
        for begin in range(0, len(own), batch):
            queries = own[begin:begin + batch]
            width = max(len(q) for q in queries)
            ids = np.zeros((len(queries), width), dtype=np.int32)  # right-padded: never read
            for i, q in enumerate(queries):
                ids[i, :len(q)] = q
            last = mx.array([len(q) - 1 for q in queries])
            cache = None if shared is None else copies(shared, len(queries))
            hidden = module.model(mx.array(ids), cache=cache)
            read = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
            logits = (read @ rows.T).astype(mx.float32)
            mx.eval(logits)
            out.append(logits)
        return mx.concatenate(out)


def example_order(support_x: np.ndarray) -> list[int]:
    """Positions of the support examples in prompt order: a permutation seeded by the
    texts' indices, so the same task always gets the same prompt and no label pattern
    (grouped, cyclic) runs through it."""
    support_x = np.asarray(support_x, dtype=np.int64)
    if not len(support_x):
        return []
    return [int(i) for i in np.random.default_rng(support_x.tolist()).permutation(len(support_x))]


def copies(cache: list, n: int) -> list:
    """``n`` rows of a batch-1 prompt cache, each a fresh KVCache holding its keys and
    values (the queries' own are appended to each row)."""
    from mlx_lm.models.cache import KVCache

    out = []
    for layer in cache:
        keys, values = layer.keys[..., :layer.offset, :], layer.values[..., :layer.offset, :]
        row = KVCache()
        row.keys = mx.repeat(keys, n, axis=0)
        row.values = mx.repeat(values, n, axis=0)
        row.offset = layer.offset
        out.append(row)
    return out


def leading_specials(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before a prompt; they lead the
    whole in-context prompt once, not every example."""
    plain = tokenizer.encode(PROMPT_TAIL, add_special_tokens=False)
    full = tokenizer.encode(PROMPT_TAIL)
    lead = len(full) - len(plain)
    if lead < 0 or full[lead:] != plain:
        raise ValueError("in_context: the tokenizer adds special tokens after a prompt, not "
                         "only before it; in-context prompts cannot be assembled from its "
                         "prompts")
    return lead


def separator_tokens(tokenizer) -> list[int]:
    """The tokens of the blank line between an example's label and the next example's
    ``"Text:"``, as the tokenizer splits them inside a whole prompt."""
    start = PROMPT.split("{text}")[0].rstrip()  # "Text:"
    label = tokenizer.encode(f"{LABEL_PREFIX} A", add_special_tokens=False)
    head = tokenizer.encode(start, add_special_tokens=False)
    joined = tokenizer.encode(f"{LABEL_PREFIX} A{SEPARATOR}{start}", add_special_tokens=False)
    middle = joined[len(label):len(joined) - len(head)]
    if joined[:len(label)] != label or joined[len(joined) - len(head):] != head or not middle:
        raise ValueError(f"in_context: the tokenizer merges the blank line with its "
                         f"neighbours ({joined}); in-context prompts cannot be assembled "
                         "from its prompts")
    return list(middle)
