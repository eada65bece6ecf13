# image.nomad.hcl: deskvm in image mode. deskvm boots a qcow2 or raw disk image through a
# per-allocation copy-on-write overlay (the base image is never written) and hands user_data
# to the guest through a cloud-init NoCloud seed. The guest powering off ends the task with
# exit code 0; stopping the job sends an ACPI power-down, then kills after kill_timeout.
#
#   nomad job run -var image=$PWD/.deps/guest/test-image.qcow2 jobs/image.nomad.hcl
variable "image" {
  type        = string
  description = "Absolute path of the disk image; it must be under one of the plugin's image_paths."
}

job "image" {
  type = "batch"

  group "image" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "vm" {
      driver = "deskvm"

      config {
        image     = var.image
        user_data = <<-EOT
          #!/bin/sh
          echo "hello from user-data, kernel $(uname -r)"
        EOT
      }

      resources {
        cpu    = 1000
        memory = 256
      }
    }
  }
}
