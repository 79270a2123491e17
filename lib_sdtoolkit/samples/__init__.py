"""Sample models: the fixture factory (:mod:`.factory`) and the layout generator (:mod:`.gen_layouts`)."""
