"""The recaptions stage: a new caption per kept pair from CoCa, a chat-completions server or transformers."""
