"""Long-running loops that follow the cluster: leader election, pull-secret copies, kubelet pull
failures, namespace labels and the serving certificate's renewal."""
