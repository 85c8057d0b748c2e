"""The method on modules and tensors (DESIGN.md, "The method"): layers, channels, contributions, profile, locate,
cut, reconstruct, assemble and scale, gates, search. Imports nothing from io/, kinds/, commands/ or cli/: any
nn.Module and any labelled data go in, modules and tensors come out."""
