"""Dataset file formats shared by the synthetic writers (:mod:`blockpilot.sim.writers`) and the replay
readers (:mod:`blockpilot.eval`): TFRecord framing and the WOD-E2E protos. Nothing here knows about
the synthetic world."""
