"""ECAC, emotion-aware cross-attention control (PortraitBooth §3.3).

Owns everything that reads or edits cross-attention:
  dispatch          `Attn2Dispatcher`: one attn2 replace slot that several patches share
                    (IPAdapter-compatible `.add()`), `attention_probs`, `apply_probs`
  layers            `cross_attention_layers`, `select_layers`, `install_on_layers`, and
                    `comfy_attention` (ComfyUI's attention, looked up per call) that they use
  capture           `AttentionCapture`, `AttentionStore`: per-word maps, differentiable for training
  control           `ExpressionControl`, `ControlSettings`: the inference-time edit inside the face
  loss              `localization_loss`, `loss_from_capture`, `ECACSettings`: L_loc of training
                    (the paper's floor term, or the log floor that keeps a gradient on a dead token)
  health            `attention_sums`, `summarize`, `CollapseMonitor`: the tokens' attention in
                    the face during training, from L_loc's maps, and the dead-token alarm
  expression_words  `find_expression_tokens`, `find_word_tokens`, `matches`, `TokenMatch`: where
                    the emotion words (from `portraitbooth_core.vocabulary`) sit in a prompt
  preview           `overlay_maps`: captured maps over images
"""
