"""The reconciler: the control loop (observe → plan → act → admit → dispatch) and its faces."""
