"""The client side: Client, LoadBalancedView, AsyncResult and friends."""
