"""FlowGRPO recipe: online RL of a flow-matching diffusion model with verl."""
