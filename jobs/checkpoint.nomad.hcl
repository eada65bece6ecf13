# checkpoint.nomad.hcl: a long batch job that yields to the desktop's owner and loses no work.
# While the owner is busy deskvm caps the VM's CPU, then pauses it, and at last checkpoints it
# into the task's local/ dir and ends the task with exit code 75 ("try again later"). Nomad
# reschedules it; ephemeral_disk { sticky, migrate } carries local/ (and the checkpoint) to
# the new allocation, on this node or another, and deskvm resumes the VM from there. The
# counter carries on where it stopped, and the result equals that of an undisturbed run.
# Stopping the allocation (nomad alloc stop) checkpoints the task the same way on its way
# out, and its replacement resumes it elsewhere. To resume on another node, every node's deskvm needs
# the same checkpoint_key_file.
variable "steps" {
  type        = number
  default     = 300
  description = "how many steps of work the job does (20-100 ms each under TCG, depending on the cap)"
}

job "checkpoint" {
  type = "batch"

  group "work" {
    ephemeral_disk {
      size    = 600
      sticky  = true
      migrate = true
    }

    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts       = 5
      interval       = "1h"
      delay          = "5s"
      delay_function = "constant"
      unlimited      = false
    }

    task "count" {
      driver = "deskvm"

      config {
        command    = "/local/count.sh"
        args       = ["${var.steps}"]
        preemption = "checkpoint"
      }

      template {
        destination = "local/count.sh"
        perms       = "755"
        data        = <<-EOT
          #!/bin/sh
          # Each step hashes the previous step's hash: the result depends on every step,
          # done once each and in order.
          h=seed
          i=0
          while [ "$i" -lt "$1" ]; do
            i=$((i + 1))
            h=$(printf '%s %s' "$h" "$i" | sha256sum | cut -c1-16)
            echo "step $i $h"
          done
          echo "$h" > /alloc/data/result
          echo "done after $1 steps: $h"
        EOT
      }

      resources {
        cpu    = 1000
        memory = 256
      }
    }
  }
}
