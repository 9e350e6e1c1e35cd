"""Model builders: the reference LM (GPTModel), H-LVLM (LLaVAModel) and U-LVLM."""
