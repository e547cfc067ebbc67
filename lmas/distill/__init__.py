"""Output-level knowledge transfer: KD losses, teacher aggregation, cached teacher outputs, the Distill strategy."""
