"""Speculative decoding: proposals (n-gram prompt lookup, a draft model), the cost model that
decides when they pay, and their counters. Verification runs in the core's runner."""
