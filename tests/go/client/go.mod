module taskd.test/goclient

go 1.19
