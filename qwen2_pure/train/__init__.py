"""Supervised fine-tuning (LoRA SFT as LLaMA-Factory does it): data formats and the qwen template (`data`)."""

from .data import (IGNORE_INDEX, QWEN_TEMPLATES, Conversation, DatasetAttr, QwenTemplate, SFTCollator, SFTData,
                   build_sft_data, encode_supervised, get_template, infer_seqlen, load_conversations,
                   load_dataset_info, pack_examples, resolve_pad_token_id, split_dataset)

__all__ = ["IGNORE_INDEX", "QWEN_TEMPLATES", "Conversation", "DatasetAttr", "QwenTemplate", "SFTCollator", "SFTData",
           "build_sft_data", "encode_supervised", "get_template", "infer_seqlen", "load_conversations",
           "load_dataset_info", "pack_examples", "resolve_pad_token_id", "split_dataset"]
