"""Chat: prompt templates and multi-turn sessions."""

from torchchat.chat.templates import (
    TEMPLATE_NAMES,
    ChatTemplate,
    HFChatTemplate,
    choose_template,
    new_turn_text,
)

__all__ = ["TEMPLATE_NAMES", "ChatTemplate", "HFChatTemplate", "choose_template", "new_turn_text"]
