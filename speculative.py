"""Speculative decoding: guess k tokens cheaply, check all of them with one target step of k + 1
tokens, keep the longest correct prefix plus one token of the target's own. The Generator
(generate.py) runs the loop; this file holds the parts that decide what is kept:

- where guesses come from: a draft model (any smaller or quantized checkpoint with the same
  tokenizer; the Generator runs it) or prompt lookup (`propose_by_lookup`: n-grams of the row's
  own text, no model at all);
- the accept/reject rule (`accept`), exact for greedy and sampling alike;
- the counts that say how well the guessing works (`SpeculationStats`).

Every function here is tensor arithmetic with static shapes and no host syncs, so it runs inside
a compiled step or a CUDA graph. Imports torch only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import FastgenError


class DraftMismatch(FastgenError):
    """A draft model that cannot speculate for this target (another tokenizer or vocabulary)."""


def draw(weights: torch.Tensor) -> torch.Tensor:
    """One id per row from weights [..., V] (any non-negative scale) without a host sync: the
    exponential race argmax(w / E), E ~ Exp(1), picks id i with probability w_i / sum(w)."""
    race = torch.empty_like(weights).exponential_(1)
    return (weights / race).argmax(dim=-1)


def propose_by_lookup(history: torch.Tensor, pos: torch.Tensor, row_start: torch.Tensor, ngram: int, k: int):
    """Prompt lookup: row b's text is history[b, row_start[b] : pos[b] + 1] (token per cache slot;
    the last one, at pos[b], is sampled but not yet in the cache). Find the latest earlier place
    where the text's last n tokens occur (n = ngram, else shorter, down to 1) and guess the k tokens
    that followed it there. Guesses past the known text, and rows with no match, repeat the last
    token: a wrong guess only costs its slot, verification keeps the output exact. Returns [B, k]."""
    B, H = history.shape
    pos = pos.view(B, 1)
    start = row_start.view(B, 1).long()
    follow = pos.clone()  # slot of the first guessed token; pos (the last token again) when nothing matches
    for n in range(1, ngram + 1):  # a longer match overrides a shorter one
        tail = history.gather(1, (pos - n + 1 + torch.arange(n, device=history.device)).clamp(min=0))  # [B, n]
        hit = (history.unfold(1, n, 1) == tail.unsqueeze(1)).all(-1)  # [B, H - n + 1]: window j = slots j..j+n-1
        j = torch.arange(H - n + 1, device=history.device).view(1, -1)
        # inside the row's text, ending before the last token (so it is followed by a known one),
        # and only where the row has n tokens at all
        hit &= (j >= start) & (j + n <= pos) & (pos - n + 1 >= start)
        latest = torch.where(hit, j, -1).amax(-1, keepdim=True)
        follow = torch.where(latest >= 0, latest + n, follow)
    guess_slots = torch.minimum(follow + torch.arange(k, device=history.device), pos)
    return history.gather(1, guess_slots)


def accept(target: torch.Tensor, guesses: torch.Tensor, draft_probs: torch.Tensor | None, greedy: bool):
    """Decide which guesses stand. guesses [B, k] were fed to the target after the last token;
    target [B, k+1, V] is then the target's logits (greedy) or its sampling distribution (after
    temperature/top-k/top-p), position i predicting what follows guess i (i = 0: the last token).
    draft_probs [B, k, V] is the distribution each guess was drawn from (a one-hot row for prompt
    lookup); greedy needs none.

    Returns (tokens [B, k+1], accepted [B]): row b keeps tokens[b, : accepted[b] + 1], the accepted
    guesses and then one token of the target's (a correction, or a bonus when all k stood).
    Greedy: a guess stands while it equals the target's argmax, so the output is plain greedy's.
    Sampling (the standard rule, Leviathan et al. 2023 / Chen et al. 2023): guess x stands with
    probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
    norm(max(0, p - q)), after k accepted from p. Every kept token is then distributed as p."""
    k = guesses.shape[1]
    if greedy:
        best = target.argmax(-1)  # [B, k+1]
        accepted = (guesses == best[:, :k]).int().cumprod(-1).sum(-1)
        return best, accepted
    p = target
    p_guess = p[:, :k].gather(-1, guesses.unsqueeze(-1)).squeeze(-1)
    q_guess = draft_probs.gather(-1, guesses.unsqueeze(-1)).squeeze(-1)
    # u < p/q with u ~ U[0, 1), written without the division (q may be tiny; p = 0 never stands)
    stands = torch.rand_like(p_guess) * q_guess < p_guess
    accepted = stands.int().cumprod(-1).sum(-1)
    residual = (p - F.pad(draft_probs, (0, 0, 0, 1))).clamp(min=0)  # position k: q = 0, so p itself
    # p == q leaves no residual, but then the guess always stands; keep the draw well defined anyway
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    own = draw(residual)  # [B, k+1]
    kept_guess = torch.arange(k + 1, device=guesses.device) < accepted.unsqueeze(-1)
    return torch.where(kept_guess, F.pad(guesses, (0, 1)), own), accepted


@dataclass
class SpeculationStats:
    """Counted over rows while they generate (a row that has finished stops counting)."""

    k: int
    verify_steps: int = 0  # row-steps: one per active row per verify step
    accepted: int = 0  # guesses that stood

    def add(self, accepted: int):
        self.verify_steps += 1
        self.accepted += accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / (self.k * self.verify_steps) if self.verify_steps else None

    @property
    def tokens_per_step(self) -> float | None:
        """Mean tokens a row keeps per verify step: its accepted guesses plus the target's own one."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else None

    def as_dict(self) -> dict:
        return {
            "speculate_k": self.k,
            "verify_steps": self.verify_steps,
            "guesses_accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_verify_step": self.tokens_per_step,
        }


def check_same_tokens(target_vocab: int, target_tokenizer, draft_vocab: int, draft_tokenizer):
    """Raise DraftMismatch unless the draft model speaks the target's tokens: the same model
    vocabulary size and the same tokenizer (every id the same token, the same special ids)."""
    if draft_vocab != target_vocab:
        raise DraftMismatch(
            f"the draft's vocabulary has {draft_vocab} ids, the target's {target_vocab}; "
            f"a draft must share the target's tokenizer"
        )
    for name in ("vocab_size", "bos_id", "eos_id", "stop_ids"):
        if getattr(draft_tokenizer, name) != getattr(target_tokenizer, name):
            raise DraftMismatch(
                f"the draft's tokenizer differs from the target's ({name}); use a draft made from "
                f"a model with the same tokenizer"
            )
    for i in range(target_tokenizer.vocab_size):
        if draft_tokenizer.id_to_token(i) != target_tokenizer.id_to_token(i):
            raise DraftMismatch(
                f"the draft's tokenizer differs from the target's (id {i} is {draft_tokenizer.id_to_token(i)!r}, "
                f"not {target_tokenizer.id_to_token(i)!r}); use a draft made from a model with the same tokenizer"
            )
