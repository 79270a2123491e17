"""LoRA and LyCORIS networks: prompt syntax, file formats, apply/restore on live modules, block weights, extract, bake.

Flow: ``syntax.parse_prompt`` -> ``registry.LoraRegistry.find`` -> ``network.load_network`` (formats + key mapping)
-> ``apply.LoraPatcher.set_networks`` (in-place, exact restore) or ``apply.FunctionalLora`` (forward hooks).
"""
