"""Solvers: turn a :class:`solvers.problem.Problem` into a :class:`dit_opt.plan.Plan`."""
