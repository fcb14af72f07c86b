"""Up-Down captioner (Anderson et al. 2018) as X-modaler's UpDown: attention LSTM + language LSTM.

Each step the attention LSTM reads the previous language-LSTM output, the mean region feature
and the word embedding; additive attention over the regions gives a context vector; the language
LSTM reads it with the attention LSTM's output and predicts the next word. The model is
naturally incremental: teacher forcing is the same step run over the caption.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..masking import masked_mean
from .captioning import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    CaptionModel,
    DecoderState,
    EncoderOutput,
    TokenEmbedding,
    VisualEmbedding,
    sample_tokens,
)


class AdditiveAttention(nn.Module):
    """Bahdanau attention of decoder rows over their image's regions (X-modaler BaseAttention)."""

    def __init__(self, hidden_size: int, att_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, att_size, bias=False)
        self.score = nn.Linear(att_size, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor, enc: EncoderOutput) -> Tensor:
        """Context [B * group, d] for hidden [B * group, H]; regions stay per image."""
        images, group = enc.num_images, enc.group
        projected = enc.cache[0]  # [B, N, att_size]
        query = self.query(hidden).view(images, group, 1, -1)
        energy = torch.tanh(query + projected[:, None])  # [B, group, N, att_size]
        scores = self.score(self.dropout(energy)).squeeze(-1)
        scores = scores.masked_fill(~enc.mask[:, None, :], float("-inf"))
        context = torch.bmm(scores.softmax(-1), enc.memory)  # [B, group, d]
        return context.reshape(images * group, -1)


class UpDownCaptioner(CaptionModel):
    """Up-Down captioner; defaults follow X-modaler's COCO updown.yaml (1000-d, attention 512)."""

    def __init__(
        self,
        vocab_size: int,
        feat_dim: int,
        *,
        hidden_size: int = 1000,
        embed_dim: int = 1000,
        visual_dim: int = 1000,
        att_size: int = 512,
        dropout: float = 0.5,
        lstm_dropout: float = 0.0,
        pred_dropout: float = 0.5,
        use_boxes: bool = False,
        max_len: int = 20,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__(vocab_size, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        self.hidden_size = hidden_size
        self.visual_embed = VisualEmbedding(
            feat_dim, visual_dim, use_boxes=use_boxes, norm=False, dropout=dropout
        )
        self.token_embed = TokenEmbedding(
            vocab_size, embed_dim, positional=False, activation=True, norm=False, dropout=dropout
        )
        self.project_regions = nn.Linear(visual_dim, att_size)
        self.att_lstm = nn.LSTMCell(hidden_size + visual_dim + embed_dim, hidden_size)
        self.attention = AdditiveAttention(hidden_size, att_size)
        self.lang_lstm = nn.LSTMCell(visual_dim + hidden_size, hidden_size)
        self.lstm_dropout = nn.Dropout(lstm_dropout)
        self.pred_dropout = nn.Dropout(pred_dropout)
        self.predictor = nn.Linear(hidden_size, vocab_size)

    def encode(self, features: Tensor, boxes: Tensor, region_mask: Tensor) -> EncoderOutput:
        """Embedded regions, their masked mean, and their attention projection, per image."""
        memory = self.visual_embed(features, boxes)
        return EncoderOutput(
            memory=memory,
            mask=region_mask,
            cache=(self.project_regions(memory),),
            pooled=masked_mean(memory, region_mask),
        )

    def init_state(self, enc: EncoderOutput, max_len: int | None = None) -> DecoderState:
        """Zero (h, c) of the attention LSTM and of the language LSTM."""
        zeros = enc.memory.new_zeros(enc.rows, self.hidden_size)
        return (zeros, zeros, zeros, zeros)

    def _cell(
        self, enc: EncoderOutput, state: DecoderState, word: Tensor, pooled: Tensor
    ) -> tuple[Tensor, DecoderState]:
        """One step from an embedded word [R, e]; returns the language-LSTM output and state."""
        h_att, c_att, h_lang, c_lang = state
        att_input = self.lstm_dropout(torch.cat([h_lang, pooled, word], dim=1))
        h_att, c_att = self.att_lstm(att_input, (h_att, c_att))
        context = self.attention(h_att, enc)
        lang_input = self.lstm_dropout(torch.cat([context, h_att], dim=1))
        h_lang, c_lang = self.lang_lstm(lang_input, (h_lang, c_lang))
        return h_lang, (h_att, c_att, h_lang, c_lang)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.predictor(self.pred_dropout(hidden))

    def decode(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Teacher-forced logits [rows, T, V]: the step run over the caption, one predictor call."""
        words = self.token_embed(input_ids)
        pooled, state = enc.per_row(enc.pooled), self.init_state(enc)
        outputs = []
        for t in range(input_ids.shape[1]):
            hidden, state = self._cell(enc, state, words[:, t], pooled)
            outputs.append(hidden)
        return self._logits(torch.stack(outputs, dim=1))

    def decode_scheduled(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Step by step as X-modaler: with prob `ss_prob` an input after BOS is drawn from the
        previous step's distribution instead of the ground truth."""
        pooled, state = enc.per_row(enc.pooled), self.init_state(enc)
        logits: list[Tensor] = []
        for t in range(input_ids.shape[1]):
            tokens = input_ids[:, t]
            if t > 0:
                swap = torch.rand(tokens.shape, device=tokens.device) < self.ss_prob
                tokens = torch.where(
                    swap & (tokens != self.pad_id), sample_tokens(logits[-1]), tokens
                )
            word = self.token_embed(tokens[:, None])[:, 0]
            hidden, state = self._cell(enc, state, word, pooled)
            logits.append(self._logits(hidden))
        return torch.stack(logits, dim=1)

    def decode_step(
        self, enc: EncoderOutput, state: DecoderState, tokens: Tensor
    ) -> tuple[Tensor, DecoderState]:
        """Log-probs of the next word after `tokens`, with the updated LSTM states."""
        word = self.token_embed(tokens[:, None])[:, 0]
        hidden, state = self._cell(enc, state, word, enc.per_row(enc.pooled))
        return self._logits(hidden).float().log_softmax(-1), state
