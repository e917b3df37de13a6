"""Fixtures shared by the library's unit tests."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (1x8x8 images, 10 labels) saved as safetensors in a local folder."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=10,  # type: ignore[call-arg]
    )
    folder = tmp_path_factory.mktemp("tiny_vit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder


TEXT_WORDS = [
    "good",
    "bad",
    "fine",
    "awful",
    "great",
    "terrible",
    "okay",
    "lovely",
    "day",
    "night",
    "food",
    "film",
    "song",
    "game",
    "team",
    "city",
    "the",
    "a",
    "is",
    "was",
    "very",
    "not",
    "so",
    "really",
    "quite",
]


def tiny_text_corpus(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` short texts over ``TEXT_WORDS`` and labels 0/1/2 that the words give away."""
    gen = torch.Generator().manual_seed(seed)
    cues = (("bad", "awful", "terrible"), ("okay", "fine", "day"), ("good", "great", "lovely"))
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        words = [TEXT_WORDS[int(j)] for j in torch.randint(len(TEXT_WORDS), (3,), generator=gen)]
        words.insert(int(torch.randint(4, (1,), generator=gen)), cues[label][i % 3])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sequence classifier (hidden 32, 2 layers) and a word-level tokenizer, built
    in memory and saved as a transformers folder: ``model.hf_name_or_path`` for tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate([*special, *TEXT_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    folder = tmp_path_factory.mktemp("tiny_bert")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM (hidden 32, 2 layers, grouped-query attention) with the tiny
    BERT's word-level tokenizer, saved as a transformers folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
