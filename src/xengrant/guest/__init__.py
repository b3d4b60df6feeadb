"""Guest-side grant-table APIs over the narrow hypercall interface."""
