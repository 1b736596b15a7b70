"""Builds engine/assets/tiny: a 512-token byte-level BPE tokenizer trained on corpus.txt (our own text).

Run from the repository root: python engine/assets/build_tiny_tokenizer.py
The result is committed; rebuilding gives the same files.
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama


def build(out_dir: str = os.path.join(HERE, "tiny"), vocab_size: int = 512) -> None:
    from engine.tokenizer import TULU_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(os.path.join(HERE, "corpus.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    chat = [f"<|user|>\n{q}\n<|assistant|>\n{a}</s>\n" for q, _, a in (ln.partition("? ") for ln in lines)]
    tok.train_from_iterator(lines + chat, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TULU_CHAT_TEMPLATE
    )
    fast.save_pretrained(out_dir)


if __name__ == "__main__":
    build()
