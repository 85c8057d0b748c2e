"""Files: the safetensors reader (validated before anything is allocated), atomic writes, the manifest schema,
model files (rebuilt through the model-kind registry), profiles and masks."""
