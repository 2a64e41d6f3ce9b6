"""The four published methods, one module each (key masking, refocusing, head guidance + HeadHunter, radial
attention), and attention maps; each is a set of edits for the core plus its own losses or search."""
