"""Built-in latent policies (memgen.LatentPolicy; docs/latent-policies.md).

ContinuousThought: Coconut's inference (Hao et al., "Training Large Language
Models to Reason in a Continuous Latent Space", facebookresearch/coconut).
After a start marker, the reasoner's last hidden state is fed back as the next
input embedding for `num_thoughts` positions, then the end marker goes in as
an input token and decoding returns to tokens. Coconut puts
`<bot> <latent>*N <eot>` in the prompt and gives latent position p the last
layer's (post-norm) hidden state of position p - 1; here the start marker may
also be sampled, and each one starts a round of thoughts.
"""
from __future__ import annotations

from memgen.latent_policy import SAMPLE, Feed, Insert, LatentPolicy


class ContinuousThought(LatentPolicy):
    """Coconut-style continuous thought.

    start_token_id  the start marker (Coconut's <|start-latent|>): a round of thoughts
                    begins after it, whether it ends the prompt or is sampled
    end_token_id    the end marker (<|end-latent|>), fed as an input token (not an
                    output) after the thoughts
    num_thoughts    continuous thoughts per round (0: the end marker follows at once)

    `record` (the output's policy_record): one int per generated token, the number
    of continuous thoughts that came right before it (num_thoughts for the first
    token after a round, else 0).
    """

    def __init__(self, start_token_id: int, end_token_id: int, num_thoughts: int):
        for name, value in (("start_token_id", start_token_id), ("end_token_id", end_token_id),
                            ("num_thoughts", num_thoughts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ContinuousThought: {name} must be an int >= 0, got {value!r}")
        self.start_token_id = start_token_id
        self.end_token_id = end_token_id
        self.num_thoughts = num_thoughts
        self.record = []

    def on_start(self, ctx) -> None:
        self._thoughts_left = 0        # thoughts still to insert in this round
        self._end_due = False          # the end marker still to feed
        self._since_token = 0          # thoughts inserted since the last token
        if ctx.prompt_token_ids[-1] == self.start_token_id:
            self._begin_round()

    def _begin_round(self) -> None:
        self._thoughts_left = self.num_thoughts
        self._end_due = True

    def on_hidden(self, ctx, hidden):
        if self._thoughts_left:
            self._thoughts_left -= 1
            self._since_token += 1
            return Insert(hidden)          # [H]: the next input is this hidden state
        if self._end_due:
            self._end_due = False
            return Feed([self.end_token_id])
        return SAMPLE

    def on_token(self, ctx, token_id: int) -> None:
        self.record.append(self._since_token)
        self._since_token = 0
        if token_id == self.start_token_id:
            self._begin_round()
