module taskd.example/client

go 1.19
