"""The shapes world: a procedural scene generator with ground truth, the small models trained on it (shipped
under ``weights/``), and their training; the ground on which each method's effect is measured."""
