"""The chat template MemGen checkpoints are trained and evaluated with."""

# MemGen's ChatML variant (spec §1.4): no default system prompt, `tool` renders
# as a user turn, other roles are dropped, non-string content renders empty,
# assistant turns sit inside generation tags (for assistant masks).
MEMGEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set text = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] in ('user', 'system', 'tool') -%}"
    "{{ '<|im_start|>' + ('user' if message['role'] == 'tool' else message['role']) + '\\n' + text"
    " + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ '<|im_start|>assistant\\n' + text + '<|im_end|>\\n' }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
